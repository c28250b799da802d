"""CLI: ``echofleet edge ...``."""

from __future__ import annotations

import typer

edge_app = typer.Typer(no_args_is_help=True)
