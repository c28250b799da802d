"""CLI: ``echofleet registry ...`` and ``echofleet certs ...``."""

from __future__ import annotations

import typer

registry_app = typer.Typer(no_args_is_help=True)
certs_app = typer.Typer(no_args_is_help=True)
