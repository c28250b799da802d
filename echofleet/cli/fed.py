"""CLI: ``echofleet simulate`` and ``echofleet evaluate`` (heavy imports happen inside commands).

Both check every argument before any work starts: a bad one is one line ``error: ...`` and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from echofleet.cli.common import fail
from echofleet.simulation import SimulationConfig
from fed.config import RunConfig

console = Console()


# Option defaults are the dataclasses' own (SimulationConfig, whose run-config fields default to
# fed.config.RunConfig, i.e. to pyproject's [tool.flwr.app.config]); tests/echofleet/test_config.py
# checks that every one of them agrees.
_D = SimulationConfig


def simulate(
    data: str = typer.Option(_D.data, help="Data spec shared out to the virtual hospitals (e.g. busi:PATH, phantom:N)."),
    task: str = typer.Option(_D.task, help="classify | segment | hc"),
    sites: int = typer.Option(_D.sites, help="Number of virtual hospitals."),
    partition: str = typer.Option(_D.partition, help="iid | dirichlet:ALPHA | by-device (one hospital per phantom profile / source)."),
    rounds: int = typer.Option(_D.rounds, help="Federated rounds."),
    epsilon: float = typer.Option(_D.epsilon, help="Target epsilon per site for the whole run (per patient where a site's data names patients, else per image)."),
    site_epsilons: Optional[str] = typer.Option(None, help="Comma list of per-site privacy budgets (policy), e.g. 8,8,0.5."),
    encoder: str = typer.Option(_D.encoder, help="Encoder config: echocare | echocare-small | echocare-tiny."),
    checkpoint: Optional[str] = typer.Option(_D.checkpoint, help="Encoder checkpoint (.pth/.safetensors/hf://...); default: seeded random init."),
    out: Path = typer.Option(Path(_D.out), help="Run directory (report, checkpoints, global model, Flower home)."),
    strategy: str = typer.Option(_D.strategy, help="fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg"),
    local_epochs: int = typer.Option(_D.local_epochs, help="Local epochs per round."),
    batch_size: int = typer.Option(_D.batch_size, help="Expected batch size (Poisson sampling rate = batch/N)."),
    lr: float = typer.Option(_D.lr, help="Local learning rate."),
    max_grad_norm: float = typer.Option(_D.max_grad_norm, help="Per-example clipping norm C."),
    noise_multiplier: float = typer.Option(_D.noise_multiplier, help="Fixed noise multiplier (0: each site calibrates to --epsilon over --rounds)."),
    seed: int = typer.Option(_D.seed, help="Seed of partition, split, initialisation, sampling and noise."),
    resume: bool = typer.Option(_D.resume, "--resume", help="Resume from the last completed round in --out."),
    cache_dir: Optional[str] = typer.Option(_D.cache_dir, help="Shared feature cache (default: each site's state dir)."),
    site_state: Optional[Path] = typer.Option(
        _D.site_state, help="Keep each virtual hospital's state (policy, lifetime ledger, splits, cache) in "
                            "SITE_STATE/site-K across runs, as a real hospital does (default: inside --out)."),
    device: str = typer.Option(_D.device, help="Every virtual hospital's compute device: auto (a GPU when usable, else the CPU) | cpu | cuda | cuda:N."),
    central_dp_noise: float = typer.Option(RunConfig.central_dp_noise, help="Central (user-level) DP noise multiplier on the server (0: off)."),
    max_update_norm: float = typer.Option(RunConfig.max_update_norm, help="Reject site updates farther than this from the global head (0: off)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and the virtual sites' log lines."),
    insecure_deterministic_noise: bool = typer.Option(
        False, "--insecure-deterministic-noise",
        help="NOT PRIVATE: seed every virtual hospital's DP noise from values the coordinator knows, for "
             "bitwise-reproducible runs in tests only. Reports and model cards then say NOT PRIVATE."),
) -> None:
    """Run a local federation through Flower's simulation engine and write the run report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from echofleet.simulation import SimulationConfigError, check, simulate as run

    try:
        budgets = [float(x) for x in site_epsilons.split(",")] if site_epsilons else []
    except ValueError:
        raise fail(f"--site-epsilons {site_epsilons!r}: expected a comma list of numbers, e.g. 8,8,0.5", 2) from None
    # Run-config keys without a field of their own in SimulationConfig travel as extra keys.
    extra = {"central-dp-noise": central_dp_noise, "max-update-norm": max_update_norm}
    cfg = SimulationConfig(data=data, task=task, sites=sites, partition=partition, rounds=rounds, epsilon=epsilon,
                           site_epsilons=budgets, encoder=encoder, checkpoint=checkpoint, out=str(out),
                           strategy=strategy, local_epochs=local_epochs, batch_size=batch_size, lr=lr,
                           max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier, seed=seed, resume=resume,
                           cache_dir=cache_dir, site_state=str(site_state) if site_state else None,
                           device=device, extra=extra, quiet=not verbose,
                           insecure_deterministic_noise=insecure_deterministic_noise)
    try:
        check(cfg)  # every argument, before any work starts
    except SimulationConfigError as e:
        raise fail(f"--{e.field.replace('_', '-')}: {e.problem}", 2) from None
    with Progress(TextColumn("[bold]federation"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        t = bar.add_task("", total=rounds)

        def progress(rnd, rl):
            agg = (rl.aggregated_evaluate if rl else {}) or {}
            desc = "  ".join(f"{k}={v:.3f}" for k, v in agg.items() if k in ("auroc", "balanced_accuracy", "dice", "hc_mae_mm"))
            bar.update(t, completed=rnd, description=desc)

        report = run(cfg, progress=progress)
    print_report(report, out)
    if report.get("global_model") is None:
        raise fail(f"{report.get('problem', 'no site trained')}; no global model written (report: {out / 'report.json'})")


def print_report(report: dict, out: Path) -> None:
    table = Table(title=f"Run report — {out}")
    for col in ("round", "site", "status", "metric", "epsilon", "steps"):
        table.add_column(col)
    metric = report.get("metric", "auroc")
    for r in report["rounds"]:
        for site, e in r["sites"].items():
            p = e.get("privacy", {})
            m = e["evaluate"].get(metric)
            table.add_row(str(r["round"]), site, e.get("rejected") and f"rejected: {e['rejected']}" or e["status"],
                          "" if m is None else f"{m:.3f}", "" if p.get("epsilon") is None else f"{p['epsilon']:.3f}",
                          "" if p.get("steps") is None else str(p["steps"]))
    console.print(table)
    if report.get("global_model") is not None:
        console.print(f"report: {out / 'report.json'}  model card: {out / 'MODEL_CARD.md'}  global model: {out / 'global'}")


def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory (uses RUN_DIR/global) or a task-model directory."),
    data: str = typer.Option(..., "--data", help="Data spec to evaluate on (e.g. busi:PATH, phantom:60)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (keys auroc, balanced_accuracy, dice, hc_mae_mm as they apply)."),
) -> None:
    """Evaluate a run's global model on any data spec and print the task's metrics."""
    from echocare.data import open_data
    from fed.evaluation import evaluate_run

    # Both arguments are checked before the model is loaded.
    if not ((run_dir / "global" / "model.json").exists() or (run_dir / "model.json").exists()):
        raise fail(f"RUN_DIR {run_dir}: no global model (expected {run_dir / 'global' / 'model.json'})", 2)
    try:
        open_data(data)
    except (ValueError, OSError, ImportError) as e:
        raise fail(f"--data: {e}", 2) from None
    try:
        result = evaluate_run(run_dir, data)
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e), 2) from None
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"{run_dir} on {data}")
    table.add_column("metric")
    table.add_column("value")
    for k, v in result.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
