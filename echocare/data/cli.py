"""CLI: ``echofleet site check`` and ``echofleet phantom`` (filled in by the data layer)."""

from __future__ import annotations

import typer

site_app = typer.Typer(no_args_is_help=True)


def phantom() -> None:
    raise typer.Exit("not implemented yet")
