"""CLI: ``echofleet simulate`` and ``echofleet evaluate`` (heavy imports happen inside commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def simulate(
    data: str = typer.Option("phantom:150?profiles=linear-a,convex-b,linear-c&seed=0", help="Data spec shared out to the virtual hospitals (e.g. busi:PATH, phantom:N)."),
    task: str = typer.Option("classify", help="classify | segment | hc"),
    sites: int = typer.Option(3, help="Number of virtual hospitals."),
    partition: str = typer.Option("iid", help="iid | dirichlet:ALPHA | by-device (one hospital per phantom profile / source)."),
    rounds: int = typer.Option(3, help="Federated rounds."),
    epsilon: float = typer.Option(8.0, help="Target epsilon per site for the whole run (example-level DP)."),
    site_epsilons: Optional[str] = typer.Option(None, help="Comma list of per-site privacy budgets (policy), e.g. 8,8,0.5."),
    encoder: str = typer.Option("echocare-tiny", help="Encoder config: echocare | echocare-small | echocare-tiny."),
    checkpoint: Optional[str] = typer.Option(None, help="Encoder checkpoint (.pth/.safetensors/hf://...); default: seeded random init."),
    out: Path = typer.Option(Path("runs/sim"), help="Run directory (report, checkpoints, global model, Flower home)."),
    strategy: str = typer.Option("fedavg", help="fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg"),
    local_epochs: int = typer.Option(1, help="Local epochs per round."),
    batch_size: int = typer.Option(32, help="Expected batch size (Poisson sampling rate = batch/N)."),
    lr: float = typer.Option(0.5, help="Local learning rate."),
    max_grad_norm: float = typer.Option(1.0, help="Per-example clipping norm C."),
    noise_multiplier: float = typer.Option(0.0, help="Fixed noise multiplier (0: each site calibrates to --epsilon over --rounds)."),
    seed: int = typer.Option(0, help="Seed of partition, split, initialisation, sampling and noise."),
    resume: bool = typer.Option(False, "--resume", help="Resume from the last completed round in --out."),
    cache_dir: Optional[str] = typer.Option(None, help="Shared feature cache (default: each site's state dir)."),
    central_dp_noise: float = typer.Option(0.0, help="Central (user-level) DP noise multiplier on the server (0: off)."),
    max_update_norm: float = typer.Option(0.0, help="Reject site updates farther than this from the global head (0: off)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and the virtual sites' log lines."),
) -> None:
    """Run a local federation through Flower's simulation engine and write the run report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from echofleet.simulation import SimulationConfig, simulate as run

    extra = {}
    if central_dp_noise > 0:
        extra["central-dp-noise"] = central_dp_noise
    if max_update_norm > 0:
        extra["max-update-norm"] = max_update_norm
    cfg = SimulationConfig(data=data, task=task, sites=sites, partition=partition, rounds=rounds, epsilon=epsilon,
                           site_epsilons=[float(x) for x in site_epsilons.split(",")] if site_epsilons else [],
                           encoder=encoder, checkpoint=checkpoint, out=str(out), strategy=strategy,
                           local_epochs=local_epochs, batch_size=batch_size, lr=lr, max_grad_norm=max_grad_norm,
                           noise_multiplier=noise_multiplier, seed=seed, resume=resume, cache_dir=cache_dir, extra=extra,
                           quiet=not verbose)
    with Progress(TextColumn("[bold]federation"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        t = bar.add_task("", total=rounds)

        def progress(rnd, rl):
            agg = (rl.aggregated_evaluate if rl else {}) or {}
            desc = "  ".join(f"{k}={v:.3f}" for k, v in agg.items() if k in ("auroc", "balanced_accuracy", "dice", "hc_mae_mm"))
            bar.update(t, completed=rnd, description=desc)

        report = run(cfg, progress=progress)
    print_report(report, out)


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
    console.print(f"report: {out / 'report.json'}  model card: {out / 'MODEL_CARD.md'}  global model: {out / 'global'}")


def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory (uses RUN_DIR/global) or a task-model directory."),
    data: str = typer.Option(..., "--data", help="Data spec to evaluate on (e.g. busi:PATH, phantom:60)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (keys auroc, balanced_accuracy, dice, hc_mae_mm as they apply)."),
) -> None:
    """Evaluate a run's global model on any data spec and print the task's metrics."""
    from fed.evaluation import evaluate_run

    try:
        result = evaluate_run(run_dir, data)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"{run_dir} on {data}")
    table.add_column("metric")
    table.add_column("value")
    for k, v in result.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
