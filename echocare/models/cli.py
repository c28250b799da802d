"""CLI: ``echofleet model inspect``."""

from __future__ import annotations

import typer

model_app = typer.Typer(no_args_is_help=True)
