"""CLI: ``echofleet site ledger STATE_DIR`` — a hospital's lifetime privacy ledger, for its DPO or an auditor.

Only typer and rich are imported at module level; the ledger module is imported inside the command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from echofleet.cli.common import fail


def ledger(
    state_dir: Annotated[Path, typer.Argument(help="The site policy's state_dir (holds ledger/).", metavar="STATE_DIR")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the ledger as one JSON object.")] = False,
    dataset: Annotated[Optional[str], typer.Option(help="Which dataset's ledger, when STATE_DIR holds several (its id).")] = None,
) -> None:
    """Print the site's lifetime privacy ledger: lifetime epsilon and delta, and every release.

    Each release (kind, run, round, noise_multiplier, sample_rate, steps, unit, time, private) lets an
    auditor recompose epsilon with any RDP accountant; an evaluation is one unsampled Gaussian
    release (sample_rate 1.0, steps 1). Exact results the policy disclosed are listed apart."""
    from fed.ledger import PrivacyLedger

    folder = Path(state_dir) / "ledger"
    if not Path(state_dir).is_dir():
        raise fail(f"STATE_DIR {state_dir}: not a folder", 2)
    found = sorted(p for p in folder.glob("*.json")) if folder.is_dir() else []
    if dataset is not None:
        found = [p for p in found if p.stem == dataset]
    if not found:
        raise fail(f"STATE_DIR {state_dir}: no privacy ledger in {folder}" + (f" for dataset {dataset}" if dataset else ""), 2)
    if len(found) > 1:
        raise fail(f"STATE_DIR {state_dir} holds ledgers of {len(found)} datasets ({', '.join(p.stem for p in found)}); "
                   "choose one with --dataset", 2)
    try:
        book = PrivacyLedger.load(found[0]).to_dict()
    except (OSError, RuntimeError) as e:
        raise fail(str(e)) from None
    book["dataset"] = found[0].stem
    if as_json:
        print(json.dumps(book))
        return
    console = Console()
    console.print(f"dataset {book['dataset']}: lifetime epsilon {book['epsilon']:.3f} of {book['budget_epsilon']:g} "
                  f"at delta {book['delta']:.2g} per {book.get('unit', 'image')} ({book['accountant']})" + ("" if book["private"] else
                  "  [bold red]NOT PRIVATE: releases with insecure deterministic noise[/]"))
    table = Table("kind", "run", "round", "sigma", "q", "steps", "private", "time")
    for r in book["releases"]:
        table.add_row(r["kind"], r["run"], str(r["round"]), f"{r['noise_multiplier']:.3f}", f"{r['sample_rate']:.4f}",
                      str(r["steps"]), "yes" if r["private"] else "NO", r["time"])
    console.print(table)
    if book["disclosures"]:
        console.print(f"{len(book['disclosures'])} exact result(s) disclosed by policy (not DP): "
                      + ", ".join(f"{d['kind']} {d['run']}#{d['round']}" for d in book["disclosures"]))
