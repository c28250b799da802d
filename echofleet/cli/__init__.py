"""``echofleet`` — the one command-line entry point.

This module only assembles the sub-commands each package owns. Every CLI module imports its heavy
dependencies (torch, flwr, openvino, ...) inside its commands, so ``echofleet edge infer`` works
on a scanner where only ``echofleet[edge]`` (no torch) is installed.
"""

from __future__ import annotations

import typer

from echofleet.cli.site import phantom, site_app
from echofleet.cli.ledger import ledger
from echofleet.cli.model import model_app
from echofleet.cli.edge import edge_app
from echofleet.cli.fed import evaluate, simulate
from echofleet.cli.certs import certs_app
from echofleet.cli.registry import registry_app
from echofleet.cli.common import ShortUsageErrors

app = typer.Typer(
    name="echofleet",
    help="Federated, differentially private EchoCare fine-tuning and signed edge deployment.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    cls=ShortUsageErrors,  # a usage error in 4 plain lines, not a panel (echofleet/cli/common.py)
)
app.add_typer(model_app, name="model", help="Inspect EchoCare encoder configs and checkpoints.")
site_app.command("ledger")(ledger)  # the site's lifetime privacy ledger (fed/ledger.py)
app.add_typer(site_app, name="site", help="A hospital's side: check its data, read its lifetime privacy ledger.")
app.command("phantom", help="Write synthetic (phantom) B-mode images with masks in BUSI's layout.")(phantom)
app.command("simulate", help="Run a local federation (Flower simulation engine) and write a run report.")(simulate)
app.command("evaluate", help="Evaluate a run's global model on any data spec.")(evaluate)
app.add_typer(edge_app, name="edge", help="Export, quantize, compile, bundle, verify and run edge builds.")
app.add_typer(registry_app, name="registry", help="Edge release registry (gRPC): serve, publish, promote, devices.")
app.add_typer(certs_app, name="certs", help="TLS certificates and SuperNode keys for a real deployment.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
